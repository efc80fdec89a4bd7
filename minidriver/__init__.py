"""minidriver: a libvirt compute driver prototype modelled on Nova's libvirt driver."""

import os

__version__ = "0.1.0"

# The embedded QEMU driver runs inside this process and logs through libvirt's own
# logger, to stderr by default: taint warnings and every error it also raises to us.
# libvirt reads this once, when the libvirt module is first imported, so it is set
# here, before any of our modules import it; a user's own setting wins.
os.environ.setdefault("LIBVIRT_LOG_OUTPUTS", "4:file:/dev/null")
