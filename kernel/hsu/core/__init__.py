"""The Core interface every HSU serves (``hsu.core.v1.Core``)."""
