"""Images in and out: folders and the built-in shapes read as training reads them, edit inputs, grids and strips
for a person, sample folders, and the time slider's page."""
