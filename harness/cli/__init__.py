"""The command line: one typer app (`common`), one module per group of verbs, `main` the entry point."""
