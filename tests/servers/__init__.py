"""Real servers started by test fixtures on 127.0.0.1: a PACS (Orthanc with its DICOMweb plugin) and an S3-compatible object store (moto)."""
