"""``--ray`` runs: ``predict`` (files and ``--project``) and the ``train`` feature store as
Ray Data pipelines (decode in CPU tasks, models in an actor pool, post-processing in CPU
tasks), for many images on a cluster.

Ray is optional (``pip install "ovss-label[ray]"``) and imported only when a run starts
(``cluster.py``); importing this package needs no Ray.
"""

from .cluster import INSTALL_HINT, RayOptions, RayRunError, RayUnavailableError, import_ray
from .ray_predict import ProposerSpec, predict_files_ray
from .records import work_folder

__all__ = [
    "INSTALL_HINT",
    "ProposerSpec",
    "RayOptions",
    "RayRunError",
    "RayUnavailableError",
    "import_ray",
    "predict_files_ray",
    "work_folder",
]
