"""`python -m stages.evaluate`: run the evaluate stage (see stages/evaluate/__init__.py)."""

from stages.evaluate.run import main

if __name__ == "__main__":
    main()
