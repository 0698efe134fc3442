"""The HDF5 feature cache: schema, writer and reader (store), shard manifests (manifest)."""
