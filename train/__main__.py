"""`dspark train` = `python -m dspark.train` = `accelerate launch -m dspark.train` (Hydra overrides after it)."""
import hydra

from dspark.guard import guarded


@hydra.main(config_path="pkg://dspark.conf", config_name="train", version_base="1.3")
def main(cfg):
    from dspark.train.trainer import run

    return guarded("train", run, cfg)


if __name__ == "__main__":
    main()
