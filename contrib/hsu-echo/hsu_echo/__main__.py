"""``python -m hsu_echo``: run the Echo HSU (under a kernel or standalone)."""

from hsu import worker
from hsu_echo import Echo, __version__

if __name__ == "__main__":
    worker.run(Echo(), version=__version__)
