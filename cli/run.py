"""`dspark run` = `python -m dspark.run`: generate → train → calibrate → bench → export, reusing finished work."""
import hydra

from dspark.guard import guarded


@hydra.main(config_path="pkg://dspark.conf", config_name="run", version_base="1.3")
def main(cfg):
    from dspark.pipeline import run

    return guarded("run", run, cfg)


if __name__ == "__main__":
    main()
