"""The study's objectives, one module each, behind one interface (`objectives.base.Objective`)."""

import logging

# As in search/__init__.py: bitsandbytes' import-time warning about a hub kernel, before heretic is imported here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
