"""The papers' three methods (DRDFL, DFML, DSLTH) and DRDFL's generative extension."""
