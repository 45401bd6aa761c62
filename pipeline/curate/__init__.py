"""Curation of a sharded dump over its embeddings: semantic dedup, hierarchical k-means, balanced sampling, new shards.

Only numpy, faiss, pyarrow, fsspec and Ray: the embeddings come from jobs/curate (which needs the model); everything
here works on embedding tables on storage. tools/curate.py wires the two.
"""
