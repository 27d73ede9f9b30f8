"""The foundation layer: settings, data schemas, run directories, raw dataset loaders, atomic
file writes, network helpers, shared errors and MLflow setup. It imports no other hyperrec
package, and every other package may import it (docs/architecture.md)."""
