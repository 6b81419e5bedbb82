"""A synthetic Alpine demo region (orthophotos, relevés, downstream data) for ``botaclip demo``."""

from botaclip_core.demo.generate import write_demo_region
from botaclip_core.demo.region import DEMO_SIZES, GENERATOR_VERSION, HABITATS, DemoSize

__all__ = ["DEMO_SIZES", "GENERATOR_VERSION", "HABITATS", "DemoSize", "write_demo_region"]
