# lme4 1.1-31 + lmerTest's printed summary() of the reference fits, the target of
# henderson's summary() (tests/test_summary.py). Run once by hand where R has lme4 and
# lmerTest; the tests never run it:
#   cd tests/data/rformat && Rscript make_summaries.R
suppressMessages(library(lmerTest))
data <- "../../../src/henderson/datasets"
read <- function(name) read.csv(file.path(data, paste0(name, ".csv")))
fits <- list(
  sleepstudy = list("Reaction ~ Days + (Days | Subject)", "sleepstudy", TRUE),
  sleepstudy_ml = list("Reaction ~ Days + (Days | Subject)", "sleepstudy", FALSE),
  penicillin = list("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin", TRUE),
  pastes = list("strength ~ 1 + (1 | batch/cask)", "pastes", TRUE),
  dyestuff2 = list("Yield ~ 1 + (1 | Batch)", "dyestuff2", TRUE),
  plants = list("height ~ moisture + (1 | pot)", "plants", TRUE))
for (name in names(fits)) {
  f <- fits[[name]]
  frame <- read(f[[2]])
  schema <- jsonlite::fromJSON(file.path(data, paste0(f[[2]], ".schema.json")))
  for (col in names(schema$categorical))
    frame[[col]] <- factor(as.character(frame[[col]]), levels = schema$categorical[[col]])
  assign(f[[2]], frame)
  m <- eval(bquote(lmer(.(as.formula(f[[1]])), data = .(as.name(f[[2]])), REML = .(f[[3]]))))
  writeLines(capture.output(print(summary(m))), paste0("summaries/", name, ".txt"))
  writeLines(capture.output(print(m)), paste0("summaries/", name, "_print.txt"))
}
