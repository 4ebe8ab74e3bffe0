"""What ephemera builds for machines without a GPU: the CPU environment, the CPU image, tiny models, and the build steps and locks they share."""
