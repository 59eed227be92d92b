"""Checkout validation (ValidateCoupon): the judgment's static steps as a dry run, behind the guessing guard."""
