"""Private implementation of attnjax. Don't import from ``attnjax._src``: use ``attnjax``."""
