"""S3 predictor and cascade polynomial regression. Not built yet: see issues 5 and 6."""
