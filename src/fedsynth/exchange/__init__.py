"""What crosses the network and in which form: UNet parameter groups, exchange plans
(FedDiffuse's FULL / USPLIT / UDEC / ULATDEC) and codecs, plus the per-side bookkeeping."""
