"""Real servers started on 127.0.0.1 by test fixtures (S3-compatible object store, ...)."""
