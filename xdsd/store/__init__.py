"""Where the shared state lives: the local state directory (``--store file``, the embedded default)
or etcd (``--store etcd://HOST:PORT[,HOST:PORT...]``), which lets several replicas serve one mesh.

A store is a source (DESIGN.md): it feeds revisions of the mesh and of the registrations into the
controller, and never reads what the layers above it build."""
