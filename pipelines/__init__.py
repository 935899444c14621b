"""The pipeline and scheduler that every saved facediff model carries as remote code.

Installed as `facediff.pipelines`; the modules here import only torch, numpy and diffusers so that they also run
as remote code where facediff is not installed.
"""

from .pipeline_facediff import FaceDiffPipeline
from .scheduling_facediff import FaceDiffScheduler, FaceDiffSchedulerOutput

__all__ = ["FaceDiffPipeline", "FaceDiffScheduler", "FaceDiffSchedulerOutput"]
