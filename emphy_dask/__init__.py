"""emphy-dask: distributed, explainable emphysema quantification on chest CT."""
__version__ = "0.1.0"
