"""Plain-text tables for command-line reports and benchmark scripts."""


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of {column: value} as an aligned text table; floats print with 4 significant digits."""
    columns = columns or list(rows[0])

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
