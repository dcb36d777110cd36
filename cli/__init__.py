"""The `kvrl` command line (click + rich): parsing, progress and printing only; no algorithms."""
