"""`dspark bench` = `python -m dspark.bench`: every method side by side on one prompt set."""
import hydra

from dspark.guard import guarded


@hydra.main(config_path="pkg://dspark.conf", config_name="bench", version_base="1.3")
def main(cfg):
    from dspark.eval.bench import run

    return guarded("bench", run, cfg)


if __name__ == "__main__":
    main()
