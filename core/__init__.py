"""The foundation every layer imports: settings, schemas, run directories, datasets, files."""
