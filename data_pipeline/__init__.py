"""The latent preprocessing job (Ray Data): images -> VAE posterior mean/std -> webdataset shards, exactly once.

  python -m data_pipeline --input URI --output URI --resolution 256 --vae ID_OR_PATH [--config YAML] [key=value]

Stages (one row = one shard: `shard_size` inputs dealt from a seeded permutation of the sorted listing, so every
shard mixes classes; a sample's key stays its index in the sorted listing):
  listing.py   sorted input listing (ImageFolder or webdataset tars, local or s3://) and shard assignment
  shards.py    decode_shard (Ray tasks: read, decode, ADM crop) and write_shard (tar, then its done record)
  encoder.py   LatentEncoder (Ray actor pool, GPU when present): image + mirror image -> posterior mean/std
  encode_step.py  the encoder's device work as one module (what compile_encoder compiles)
  job.py       checks, resume (skip shards with a done record), rejects/latent_stats/manifest written last
  images.py    bytes -> RGB -> centre crop, or a RejectedImage with the reason
The output format is dig.data.shard_format; all I/O goes through dig.data.storage.
"""
