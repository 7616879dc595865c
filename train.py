"""Main entry point. For now it runs the MoE layer demo (`jmoe.demo`)."""

from jmoe.demo import run

if __name__ == "__main__":
    run()
