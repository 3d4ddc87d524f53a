"""Search strategies and the Ray runner. Not built yet: see issue 5 (search) and issue 6 (DC fitting)."""
