"""One module per dataset: download spec, ``synthesize`` (a small fake in the exact raw
upstream format), ``prepare`` (raw files -> compact arrays + manifest) and ``load``."""
