# The Streamlit page as a Hugging Face Docker Space: `python app/make_space.py --streamlit`
# writes the folder to upload, with this file, and the page's settings for a Space as
# .streamlit/config.toml (app/streamlit_space.toml: address, port 8501 = the README's app_port,
# the upload limit, and the XSRF check off, which uploads from inside the Space's page need).
FROM python:3.11-slim

# Spaces run the container as user 1000; pip and Streamlit write into its home.
RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /home/user/app

# The same pinned requirements.txt as `make install`; torch from PyPI brings its CUDA libraries
# (a GPU Docker Space uses them, the free CPU one does not).
COPY --chown=user requirements.txt .
RUN pip install --no-cache-dir --user -r requirements.txt
COPY --chown=user . .

EXPOSE 8501
# tests/test_space.py runs exactly this command in the folder make_space.py writes.
CMD ["streamlit", "run", "app/streamlit_app.py"]
