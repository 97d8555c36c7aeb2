"""`dspark generate` = `python -m dspark.generate` (also under `accelerate launch`)."""
import hydra

from dspark.guard import guarded


@hydra.main(config_path="pkg://dspark.conf", config_name="generate", version_base="1.3")
def main(cfg):
    from dspark.data.generate import run

    return guarded("generate", run, cfg)


if __name__ == "__main__":
    main()
