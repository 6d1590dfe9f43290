"""Latent shards: the on-disk format shared with data_pipeline, storage URIs (local or s3://), readers."""
