"""dssefs: a FUSE file system over S3 where every object carries two independent AES-256-GCM layers."""

__version__ = "0.1.0"
