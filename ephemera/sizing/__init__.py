"""How big a machine a job needs: model configs and shapes, the memory estimate, price catalogs and the plan."""
