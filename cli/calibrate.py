"""`dspark calibrate` = `python -m dspark.calibrate`: STS temperatures for a trained head."""
import hydra

from dspark.guard import guarded


@hydra.main(config_path="pkg://dspark.conf", config_name="calibrate", version_base="1.3")
def main(cfg):
    from dspark.eval.calibrate import run

    return guarded("calibrate", run, cfg)


if __name__ == "__main__":
    main()
