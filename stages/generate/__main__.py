"""`python -m stages.generate`: run the generate stage (see stages/generate/__init__.py)."""

from stages.generate.run import main

if __name__ == "__main__":
    main()
