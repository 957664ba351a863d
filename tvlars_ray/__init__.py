"""tvlars-ray: large-batch training experiments with LARS, LAMB and TVLARS, run on Ray.

``python -m tvlars_ray.run`` is the command line; :mod:`tvlars_ray.store` reads results.
"""

__version__ = "0.1.0"
