"""`dspark export` = `python -m dspark.export`: a Hub-ready head folder (and `push_to_hub=true`)."""
import hydra

from dspark.guard import guarded


@hydra.main(config_path="pkg://dspark.conf", config_name="export", version_base="1.3")
def main(cfg):
    from dspark.hub.export import run

    return guarded("export", run, cfg)


if __name__ == "__main__":
    main()
