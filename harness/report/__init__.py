"""Reading runs for people: tables, plots, the markdown/HTML report, and comparing two runs."""
