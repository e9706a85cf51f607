"""Building a harm direction when the user has none (``ckptops harm make``)."""
