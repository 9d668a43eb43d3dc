"""`python -m stages.validate`: run the validate stage (see stages/validate/__init__.py)."""

from stages.validate.run import main

if __name__ == "__main__":
    main()
