"""hyperrec core: settings, data contracts, run context, dataset loaders and the CLI."""

__version__ = "0.1.0"
