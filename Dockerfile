# xdsd, plus the demo app used by the docker-compose test mesh.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY xdsd ./xdsd
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --force-reinstall --no-deps "opentelemetry-proto==$(python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" \
 && useradd --system --home /var/lib/xdsd xdsd && mkdir -p /var/lib/xdsd && chown xdsd /var/lib/xdsd
COPY demo/app.py /demo/app.py
USER xdsd
EXPOSE 18000 18001 19000
ENTRYPOINT ["xdsd"]
CMD ["serve", "--config", "/etc/xdsd/mesh.yaml", "--xds-address", "0.0.0.0:18000", "--admin-address", "0.0.0.0:19000", "--authz-http-address", "0.0.0.0:18001", "--state-dir", "/var/lib/xdsd"]
