"""The study's objectives, one module each, behind one interface (`objectives.base.Objective`)."""
