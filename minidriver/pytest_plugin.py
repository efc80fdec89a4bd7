"""The pytest plugin's registered path: a re-export of :mod:`minidriver.testing.plugin`.

The ``pytest11`` entry point and users' imports (``from minidriver.pytest_plugin
import MinidriverVMFactory``) name this module; the plugin itself lives with the other
tooling in :mod:`minidriver.testing`. pytest registers this module, and finds the hooks
and fixtures through the names below; the implementation module is never registered
on its own, so nothing is registered twice.
"""

from minidriver.testing.plugin import (
    ConsoleWaitFailed,
    MinidriverTemplate,
    MinidriverTemplateFactory,
    MinidriverVM,
    MinidriverVMFactory,
    _minidriver_session,
    minidriver_config,
    minidriver_driver,
    minidriver_template,
    minidriver_test_image,
    minidriver_vm,
    pytest_addoption,
    pytest_configure,
    pytest_runtest_makereport,
    pytest_sessionfinish,
)

__all__ = [
    "ConsoleWaitFailed",
    "MinidriverTemplate",
    "MinidriverTemplateFactory",
    "MinidriverVM",
    "MinidriverVMFactory",
    "_minidriver_session",
    "minidriver_config",
    "minidriver_driver",
    "minidriver_template",
    "minidriver_test_image",
    "minidriver_vm",
    "pytest_addoption",
    "pytest_configure",
    "pytest_runtest_makereport",
    "pytest_sessionfinish",
]
