"""The local resource: jobs as supervised process trees on this machine."""

from controllers.resources.local.resource import LocalResource

__all__ = ["LocalResource"]
