"""A compute resource backed by a Slurm cluster's slurmrestd."""

from controllers.resources.slurm.resource import SlurmResource, SlurmSettings

__all__ = ["SlurmResource", "SlurmSettings"]
