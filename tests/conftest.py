# The product runs monkey-patched; so do the in-process tests.
from gevent import monkey

monkey.patch_all()
