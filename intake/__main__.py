"""`python -m intake`: the Kafka intake in its own process."""

if __name__ == "__main__":
    from infra.exit import run_and_exit
    from intake.consumer import main

    run_and_exit(main)
