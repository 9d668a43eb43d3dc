"""`python -m stages.scrape`: run the scrape stage (see stages/scrape/__init__.py)."""

from stages.scrape.run import main

if __name__ == "__main__":
    main()
